"""The hand-over formats: what one stage writes and a later stage reads, one module each.

- ``space``: the input space images live in (dataset normalisation, and ZCA whitening when used);
  every format below carries one.
- ``experts``: the experts buffer (one trajectory file per expert, a manifest, the input space).
- ``synthetic``: a distilled set (images, hard labels and optional soft labels, learned step size).
- ``model``: a trained network (safetensors weights, architecture, input space).

A stage that writes a format and a stage that reads it both go through its module, so stages never
import each other. Loading never unpickles, checks what it loaded, and an error names the run and file.
"""
