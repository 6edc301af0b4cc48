"""Everything between files on disk and a training batch.

- `spec`: data SPECs (format detection, `FORMAT:PATH`, YAML mixtures) → `load_samples` (a list, for evaluation) and
  `build_dataset` (torch datasets for training, map-style or streaming);
- readers: `cauldron`, `swift`, `messages`, `coco` (detection → grounding, wording in `prompts`), all `source.Source`;
- `images`: decoding with clear skip reasons; `tally`: counts that add up across DataLoader workers;
- `collate.VisionChatCollator`: Samples → batches (loss masks, overflow policies, packing), with `encode`, `render`
  and `tiles` doing one step each;
- `shapes`: the synthetic shapes world for tests, the demo and benchmarks; `writers`/`shapes_io` write every format;
- `inspect` and `commands`: `vlmgraft data inspect|shapes`; `report.data_report` for the end of a run.
"""
