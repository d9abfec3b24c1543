// An llmos client in Go with nothing but the standard library: the HTTP/JSON gateway
// (llmosd --http ADDR) takes every syscall as POST /v1/kernel/<Method> with the protobuf JSON
// mapping. It spawns the echo program, sends it a message from a port, takes the reply, stops
// echo and prints its final state.
//
//	go run . http://127.0.0.1:8080
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
)

var base = "http://127.0.0.1:8080"

// call POSTs request to a syscall and decodes the answer into reply; an error answer
// ({"error": {"code", "status", "message"}}) becomes a Go error.
func call(method string, request any, reply any) error {
	body, err := json.Marshal(request)
	if err != nil {
		return err
	}
	resp, err := http.Post(base+"/v1/kernel/"+method, "application/json", bytes.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e struct {
			Error struct {
				Status  string `json:"status"`
				Message string `json:"message"`
			} `json:"error"`
		}
		json.NewDecoder(resp.Body).Decode(&e)
		return fmt.Errorf("%s: %s: %s", method, e.Error.Status, e.Error.Message)
	}
	return json.NewDecoder(resp.Body).Decode(reply)
}

func main() {
	if len(os.Args) > 1 {
		base = os.Args[1]
	}
	var spawned, port struct{ Pid string } // 64-bit integers are JSON strings
	must(call("Spawn", map[string]any{"path": "lua/echo.lua"}, &spawned))
	must(call("OpenPort", map[string]any{}, &port))

	var sent struct{ MessageId string }
	must(call("Send", map[string]any{"from": port.Pid, "to": spawned.Pid, "tag": "ask",
		"body": map[string]any{"hello": "from go", "n": 3}, "correlationId": "go-1"}, &sent))
	var got struct {
		TimedOut bool
		Message  struct {
			From string
			Body any
		}
	}
	must(call("Recv", map[string]any{"pid": port.Pid, "correlationId": "go-1", "timeoutMs": 10000}, &got))
	fmt.Printf("reply from %s: %v\n", got.Message.From, got.Message.Body)

	must(call("Send", map[string]any{"from": port.Pid, "to": spawned.Pid, "tag": "stop"}, &sent))
	var done struct {
		Process struct {
			State      string
			ExitReason string
			Result     any
		}
	}
	must(call("Wait", map[string]any{"pid": spawned.Pid, "timeoutMs": 10000}, &done))
	fmt.Printf("echo %s (%s): %v\n", done.Process.State, done.Process.ExitReason, done.Process.Result)
	var killed struct{}
	must(call("Kill", map[string]any{"pid": port.Pid}, &killed))
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
