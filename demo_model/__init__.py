"""The embedded demo model: a small stable-audio-tools text-to-audio model and everything that makes it.

`corpus` synthesises captioned clips from a small caption grammar, `vocab` is the word-level tokenizer,
`config` the SAT model config (an MDCT autoencoder pretransform under a DiT with SAO's block structure),
`mdct` the autoencoder's fixed weights, `stream` the supply of training clips, `train` the training
script (`ptq-train`) and `adherence` the evaluator that checks a clip against its caption from the audio
alone (`ptq-adherence`). docs/demo_model.md is the model card.
"""
