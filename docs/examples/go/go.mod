module llmos.example/echo

go 1.19
