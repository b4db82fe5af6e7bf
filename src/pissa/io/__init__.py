"""Files, with no model loaded: the safetensors index and lazy reader, the shard writer, atomic
output folders, PEFT adapter folders as state dicts, and the `pissa.json` manifest. Imports neither
peft nor transformers' model code."""
