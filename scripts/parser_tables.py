"""Save the parser's tables again (tvlang/language/parser_tables.json) after the grammar changes.

    python scripts/parser_tables.py

tvlang loads these tables at start instead of building them from grammar/tvlang.lark; tables
made from another grammar, or by another version of Lark, are ignored and the parser is built
(tvlang.language.syntax._parser). tests/test_syntax.py fails while the saved tables do not match
the grammar. Lark numbers its parse states in an order that varies from run to run, so two runs
over the same grammar write different files that parse alike.
"""

from tvlang.language.syntax import TABLES_FILE, write_tables

if __name__ == "__main__":
    write_tables()
    print(f"wrote {TABLES_FILE}")
