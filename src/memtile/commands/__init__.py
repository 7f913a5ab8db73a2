"""One module per CLI command. Each defines `HELP`, `add_arguments(parser)` and `run(args) -> int`;
a capability that adds a section to `memtile report` also defines
`report_section(name, model, inputs, out) -> str`
(markdown). `COMMANDS` is the order the CLI and the report list them in."""

COMMANDS = ("profile", "plan", "run", "tile", "train", "export", "report")
