"""`--where`: a small expression language over the scores table's columns, parsed here and never handed to eval.

    expr       := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison | "(" or_expr ")"
    comparison := COLUMN OP value | COLUMN "in" "(" value ("," value)* ")"
    OP         := "==" | "!=" | "<" | "<=" | ">" | ">="
    value      := NUMBER | 'string' | "string"

    similarity >= 0.28 and language == 'en' and caption_tokens > 2

Anything else (calls, attributes, unknown columns, stray characters) is a one-line ConfigError. An expression is
a conjunction of rules (its top-level `and` terms), which the filter's manifest counts one by one.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from contrastive.errors import ConfigError

_TOKEN = re.compile(r"""\s*(?:(?P<number>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|-?\.\d+(?:[eE][-+]?\d+)?)
                        |(?P<string>'[^']*'|"[^"]*")
                        |(?P<op>==|!=|<=|>=|<|>|\(|\)|,)
                        |(?P<word>[A-Za-z_][A-Za-z_0-9]*))""", re.VERBOSE)
_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
            ">=": operator.ge}
_KEYWORDS = {"and", "or", "not", "in"}

Columns = dict[str, np.ndarray]
Predicate = Callable[[Columns], np.ndarray]


def tokenize(text: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise ConfigError(f"--where: cannot read {text[position:].strip()[:30]!r} at character {position} "
                              f"(only comparisons of columns with numbers or quoted strings, and/or/not, parentheses)")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


@dataclass(frozen=True)
class Rule:
    text: str  # the rule as written, for the manifest
    predicate: Predicate


class _Parser:
    def __init__(self, text: str, columns: set[str]) -> None:
        self.text, self.columns = text, columns
        self.tokens = tokenize(text)
        self.position = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token is None or (expected is not None and token[1] != expected):
            found = "the end" if token is None else repr(token[1])
            raise ConfigError(f"--where {self.text!r}: expected {expected or 'more'}, found {found}")
        self.position += 1
        return token

    def at_word(self, word: str) -> bool:
        token = self.peek()
        return token is not None and token == ("word", word)

    def rules(self) -> list[tuple[int, int, Predicate]]:
        """The top-level `and` terms with their token spans; an expression with a top-level `or` is one rule."""
        terms = self.and_terms()
        if not self.at_word("or"):
            return terms
        return [(0, len(self.tokens), self.or_expr(first=self._all(terms)))]

    def or_expr(self, first: Predicate | None = None) -> Predicate:
        alternatives = [first or self._all(self.and_terms())]
        while self.at_word("or"):
            self.take("or")
            alternatives.append(self._all(self.and_terms()))
        return alternatives[0] if len(alternatives) == 1 else (
            lambda cols: np.logical_or.reduce([a(cols) for a in alternatives]))

    def and_terms(self) -> list[tuple[int, int, Predicate]]:
        terms = []
        while True:
            start = self.position
            predicate = self.not_expr()
            terms.append((start, self.position, predicate))
            if not self.at_word("and"):
                return terms
            self.take("and")

    @staticmethod
    def _all(terms: list[tuple[int, int, Predicate]]) -> Predicate:
        predicates = [predicate for _, _, predicate in terms]
        return predicates[0] if len(predicates) == 1 else (
            lambda cols: np.logical_and.reduce([p(cols) for p in predicates]))

    def not_expr(self) -> Predicate:
        if self.at_word("not"):
            self.take("not")
            inner = self.not_expr()
            return lambda cols: ~inner(cols)
        if self.peek() == ("op", "("):
            self.take("(")
            inner = self.or_expr()
            self.take(")")
            return inner
        return self.comparison()

    def value(self) -> float | str:
        kind, text = self.take()
        if kind == "number":
            return float(text)
        if kind == "string":
            return text[1:-1]
        raise ConfigError(f"--where {self.text!r}: expected a number or a quoted string, found {text!r}")

    def comparison(self) -> Predicate:
        kind, name = self.take()
        if kind != "word" or name in _KEYWORDS:
            raise ConfigError(f"--where {self.text!r}: expected a column name, found {name!r}")
        if name not in self.columns:
            known = ", ".join(sorted(self.columns))
            raise ConfigError(f"--where {self.text!r}: unknown column {name!r}; columns: {known}")
        if self.at_word("in"):
            self.take("in")
            self.take("(")
            values = [self.value()]
            while self.peek() == ("op", ","):
                self.take(",")
                values.append(self.value())
            self.take(")")
            return lambda cols: np.isin(cols[name], values)
        kind, op = self.take()
        if kind != "op" or op not in _COMPARE:
            raise ConfigError(f"--where {self.text!r}: expected a comparison after {name!r}, found {op!r}")
        value, compare = self.value(), _COMPARE[op]
        return lambda cols: np.asarray(compare(cols[name], value), dtype=bool)


def parse_where(text: str, columns: set[str]) -> list[Rule]:
    """The expression's top-level `and` terms as rules; their conjunction is the expression."""
    parser = _Parser(text, columns)
    if not parser.tokens:
        raise ConfigError("--where is empty")
    terms = parser.rules()
    if parser.peek() is not None:
        raise ConfigError(f"--where {text!r}: unexpected {parser.peek()[1]!r}")
    rules = []
    for start, end, predicate in terms:
        rules.append(Rule(" ".join(token for _, token in parser.tokens[start:end]), predicate))
    return rules
