"""The training spec at the trainer's edge: the typed config (config), the checker and validators that build it from
requests (checker, validate, lr_sweep), and the way back to protobuf and from the job store (convert)."""
