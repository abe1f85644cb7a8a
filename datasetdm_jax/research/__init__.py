"""Research instruments: the experiments that test the method, apart from the product
(`datasetdm exp <name>`; results in docs/experiments/). Nothing in the product imports them, except
``shapes_sd``'s optional judged-fidelity training curve (``judge``).

- ``proof``: the P-Decoder against a scratch model, all four tasks (``datasetdm exp proof``);
- ``baselines``: that scratch model, trained and scored like ``datasetdm train`` (``datasetdm exp baseline``);
- ``probe``: a 1x1-conv head on the frozen UNet features against a scratch segmenter (``datasetdm exp probe``);
- ``judge``: a classifier of the shapes world's class and colour, the generator's yardstick
  (``datasetdm exp fidelity``);
- ``diagnose``: after the demo, what more real, P-Decoder-labelled or generated images are worth
  (``datasetdm exp diagnose``);
- ``shapes_depth_floor``: how well depth can be predicted at all in the shapes world
  (``python -m datasetdm_jax.research.shapes_depth_floor``).
"""
