"""Board and device targets as data: one TOML file per target (see mbn_codegen.targets_api)."""
