"""calculator.py: a tool-calling agent that answers questions with a calculator (a function of
this program) and the file tools, and remembers its earlier answers in memory/calculator.json.

    llmos spawn userland/python/calculator.py --args '{"question": "What is 12.5 * 8?"}'

args: question, and max_steps (default 4). Returns {answer, steps, tokens, stopped, calls}:
each call with its name, arguments (valid for the tool's schema), whether it worked and its
result.
"""
from llmos.std import agent
from llmos.userland import sys

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def calculate(a: float, op: str, b: float) -> float:
    return OPERATIONS[op](a, b)


args = sys.args or {}
calculator = agent.Agent(
    system="You answer questions. Use the calculate tool for arithmetic, the file tools for files.",
    tools=[
        agent.tool(calculate, "Compute a op b", {"a": {"type": "number"}, "op": {"enum": list(OPERATIONS)},
                                                 "b": {"type": "number"}}),
        agent.read_file(), agent.write_file(), agent.list_files(),
    ],
    max_steps=args.get("max_steps", 4), token_budget=3000, max_tokens=120, first_tool_choice="required",
    memory="memory/calculator.json",
)
sys.exit(calculator.run(args.get("question", "What is 12.5 * 8?")))
