"""Training and evaluation data: records from files, the bundled `arith` set or the hub (`records`), what
each format means (`formats`, chat turns in `messages`), the records TRL trains on (`sft`, `preference`,
with the chat template marked for every assistant turn by `template`), and the same tokens outside a
trainer for evaluation (`tokens`)."""
