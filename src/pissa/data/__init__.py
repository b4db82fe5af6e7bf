"""Training and evaluation data: records from files, the bundled `arith` set or the hub (`records`),
turned into token ids with the loss on the response only (`tokens`)."""
