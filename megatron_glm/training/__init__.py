"""Training on DeepSpeed: one code path for a world of 1 to N processes.

- ``preflight``: launch-time config checks, run before any process group exists.
- ``distributed``: process group from the launcher's environment (deepspeed, torchrun, python).
- ``engine``: DeepSpeed config dict, AdamW with weight-decay groups, the loss-computing module.
- ``step``: the step runners (data-parallel, pipeline), chosen once; global-batch loss
  normalisation.
- ``pipeline``: the GLM's layers in DeepSpeed's PipelineModule, the last stage's loss, the
  optimizer-step hook.
- ``losses``: what a kind of training minimises (a batch -> loss sums); pretraining's.
- ``loss_stats``: loss sums of a step or an evaluation, reduced in one collective.
- ``batches``: the batch contract as the trainer sees it (micro-batch dicts, batch sources).
- ``evaluation``: validation losses and their log line.
- ``lr_schedule``: GLM's AnnealingLR (warmup, then cosine/linear decay to a floor).
- ``loop``: the training loop: steps, validation, logging, checkpoints, stops.
- ``checkpoint``: atomic publication, client state, per-rank RNG, resume, resharding to
  another layout with the optimizer state.
- ``metrics``: tokens/s, TFLOP/s, MFU against a peak table, TensorBoard scalars.
- ``signals``: SIGTERM/SIGINT/SIGUSR1, a lost launcher and a deadline, agreed on by all ranks.
- ``data_source``: the real batch source (tokenizer, packed splits, blank infilling, loaders).
- ``session``: one run end to end (``megatron_glm.pretrain`` calls it).
- ``whole_model``: the engine's weights as one plain ``GLMModel`` per TP rank, from any layout
  (pipeline stages, ZeRO-3 partitions), for decoding during a run (finetuning's ROUGE).
"""
