"""llmos.std: the userland standard library (docs/userland-library.md).

Python agents import its modules (`from llmos.std import supervisor`); Lua programs
`require` the .lua twins that live in this same directory (llmosd finds it through this
package). Nothing is imported here: llmosd imports this package only to find the directory.
"""
