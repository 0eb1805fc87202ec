"""Tools around the main commands: kernel and decode benchmarks, generation from an export,
llama2.c conversion, and the architecture coverage check. App layer: may import any package."""
