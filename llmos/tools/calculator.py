"""The `calculator` tool: arithmetic on an expression an LLM wrote, so untrusted input.

The expression is parsed by Python's own parser (`ast.parse(mode="eval")`) and the tree is
walked by `Calculator`, which knows only numbers, + - * / // % **, unary signs, the
constants pi and e and a fixed table of math functions. Nothing is ever compiled to code
or evaluated by Python, so names like `__import__` are just unknown names. Every value is
checked as it is made, so no input can make the walk take long or hold much memory: the
input is at most MAX_CHARS long and MAX_DEPTH deep, integers stay under MAX_BITS bits and
an integer power whose result would be larger is refused before it is computed.
"""

from __future__ import annotations

import ast
import math
import operator

from llmos.errors import InvalidRequestError

MAX_CHARS = 1000
MAX_DEPTH = 100
MAX_BITS = 10_000
MAX_ROUND_DIGITS = 100

CONSTANTS = {"pi": math.pi, "e": math.e}

# name -> (function, least arguments, most arguments)
FUNCTIONS = {
    "sqrt": (math.sqrt, 1, 1), "sin": (math.sin, 1, 1), "cos": (math.cos, 1, 1),
    "tan": (math.tan, 1, 1), "log": (math.log, 1, 2), "log10": (math.log10, 1, 1),
    "exp": (math.exp, 1, 1), "abs": (abs, 1, 1), "round": (round, 1, 2),
    "min": (lambda *xs: min(xs), 1, 32), "max": (lambda *xs: max(xs), 1, 32),
    "floor": (math.floor, 1, 1), "ceil": (math.ceil, 1, 1),
}

BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}

UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}

# What to call a refused node in a message; others go by their class name.
SYNTAX_NAMES = {
    ast.Attribute: "attribute access", ast.Subscript: "subscript", ast.Lambda: "lambda",
    ast.Compare: "comparison", ast.BoolOp: "boolean operator", ast.IfExp: "conditional expression",
    ast.List: "list", ast.Tuple: "tuple", ast.Dict: "dict", ast.Set: "set",
    ast.ListComp: "comprehension", ast.GeneratorExp: "comprehension", ast.JoinedStr: "f-string",
    ast.NamedExpr: "assignment", ast.Starred: "starred argument", ast.Await: "await",
}


class CalculatorError(InvalidRequestError):
    """The expression is not arithmetic the calculator accepts; the message says where."""


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression such as `2 * sqrt(2) + 10 // 3`."""
    return Calculator().evaluate(expression)


class Calculator:
    """Walks a parsed expression over a whitelist of node types, checking every value."""

    def evaluate(self, expression: str) -> int | float:
        if not isinstance(expression, str):
            raise CalculatorError(f"expression: must be a string, got {type(expression).__name__}")
        if len(expression) > MAX_CHARS:
            raise CalculatorError(f"expression too long: {len(expression)} characters, at most {MAX_CHARS}")
        if not expression.strip():
            raise CalculatorError("empty expression")
        try:  # a parse to a tree, never compiled to code
            tree = ast.parse(expression.strip(), mode="eval")
        except SyntaxError as e:
            raise CalculatorError(f"syntax error at column {e.offset or 0}: {e.msg}") from None
        except (RecursionError, MemoryError):
            raise CalculatorError("expression nested too deeply") from None
        except ValueError as e:  # null bytes, on Python versions that raise ValueError for them
            raise CalculatorError(f"invalid expression: {e}") from None
        return self._eval(tree.body, 0)

    def _eval(self, node: ast.AST, depth: int) -> int | float:
        if depth > MAX_DEPTH:
            raise CalculatorError(f"expression nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(node, ast.Constant):
            return self._number(node)
        if isinstance(node, ast.Name):
            if node.id not in CONSTANTS:
                raise CalculatorError(f"unknown name {node.id!r}{_where(node)}")
            return CONSTANTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
            return UNARY[type(node.op)](self._eval(node.operand, depth + 1))
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            left = self._eval(node.left, depth + 1)
            right = self._eval(node.right, depth + 1)
            return self._binary(node, left, right)
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        what = SYNTAX_NAMES.get(type(node), type(node).__name__.lower())
        if isinstance(node, (ast.BinOp, ast.UnaryOp)):
            what = f"operator {type(node.op).__name__}"
        raise CalculatorError(f"unsupported syntax: {what}{_where(node)}")

    def _number(self, node: ast.Constant) -> int | float:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            kind = "string" if isinstance(value, (str, bytes)) else f"constant {value!r}"
            raise CalculatorError(f"unsupported syntax: {kind}{_where(node)}")
        return _checked(value, node)

    def _binary(self, node: ast.BinOp, left: int | float, right: int | float) -> int | float:
        if isinstance(node.op, ast.Pow):
            _check_power(node, left, right)
        try:
            value = BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError(f"division by zero{_where(node)}") from None
        except OverflowError:
            raise CalculatorError(f"result too large{_where(node)}") from None
        return _checked(value, node)

    def _call(self, node: ast.Call, depth: int) -> int | float:
        if not isinstance(node.func, ast.Name):
            raise CalculatorError(f"unsupported syntax: call of a non-function{_where(node)}")
        name = node.func.id
        if name not in FUNCTIONS:
            raise CalculatorError(f"unknown function {name!r}{_where(node)}")
        if node.keywords:
            raise CalculatorError(f"{name}: keyword arguments are not supported{_where(node)}")
        function, least, most = FUNCTIONS[name]
        if not least <= len(node.args) <= most:
            wanted = f"{least} to {most} arguments" if least != most else \
                f"{least} argument" + ("" if least == 1 else "s")
            raise CalculatorError(f"{name}: takes {wanted}, got {len(node.args)}{_where(node)}")
        args = [self._eval(arg, depth + 1) for arg in node.args]
        if name == "round" and len(args) == 2 and \
                (not isinstance(args[1], int) or abs(args[1]) > MAX_ROUND_DIGITS):
            raise CalculatorError(f"round: digits must be an integer within ±{MAX_ROUND_DIGITS}{_where(node)}")
        try:
            value = function(*args)
        except ZeroDivisionError:
            raise CalculatorError(f"division by zero in {name}{_where(node)}") from None
        except OverflowError:
            raise CalculatorError(f"result too large in {name}{_where(node)}") from None
        except (ValueError, TypeError) as e:
            raise CalculatorError(f"{name}: {e}{_where(node)}") from None
        return _checked(value, node)


def _check_power(node: ast.BinOp, base: int | float, exponent: int | float) -> None:
    """Refuse an integer power whose result would exceed MAX_BITS before computing it:
    9**9**9 would otherwise hold the CPU for minutes and gigabytes of memory."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1 \
            and exponent * math.log2(abs(base)) > MAX_BITS:
        raise CalculatorError(f"exponent too large{_where(node)}: the result would exceed {MAX_BITS} bits")


def _checked(value, node: ast.AST) -> int | float:
    """Every intermediate value is a real, finite number and integers stay small."""
    if isinstance(value, complex):
        raise CalculatorError(f"result is not a real number{_where(node)}")
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise CalculatorError(f"number too large{_where(node)}: more than {MAX_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError(f"result too large{_where(node)}")
    return value


def _where(node: ast.AST) -> str:
    return f" at column {node.col_offset + 1}" if hasattr(node, "col_offset") else ""
