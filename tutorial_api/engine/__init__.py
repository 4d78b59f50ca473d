"""The kit's own engine: continuous batching of a transformers model on one worker thread.

A request's path through it:

    Engine.start(prepared)           queue a Generation (engine.py), WAITING
    Engine._step(), on the worker:   1) schedule: the newcomers that fit the prefill budget
      Batch.admit(newcomers)         2) join (prompt cached but its last token) or prefill them;
                                        their first tokens stream before the running rows' step
      Batch.decode()                 3) one token for every row (decode_step.py), then
        Batch._sample / _deliver        sampler.py picks it, Generation.accept takes it
        Generation.accept(token)        text_stream.py detokenizes, stop strings end it
      Batch.drop_finished()          4) finished rows leave, feeding prefix_cache.py
    Generation.stream()              the text, back on the event loop (call_soon_threadsafe)

packed_linear.py lays the model's weights out for oneDNN; thread_policy.py picks the CPU threads.
This package implements `tutorial_api.backend.Backend` and knows nothing of HTTP.
"""
