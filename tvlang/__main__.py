from tvlang.faces.cli import entry

entry()
