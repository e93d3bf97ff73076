# The findings runs of docs/FINDINGS.md, from the repository root (2 CPU cores; about 1.5 hours together
# on an otherwise idle machine). The specs are in this folder; the sweeps add their own cnn controls.
capsweep run docs/findings/findings-depth.yaml --num-cpus 2
capsweep run docs/findings/findings-bias.yaml --num-cpus 2
capsweep report --experiment capsweep --sweep findings-depth --out docs/findings/depth
capsweep report --experiment capsweep --sweep findings-bias --reference findings-depth --out docs/findings/bias
# issue #11: the parse-tree sweep on the generated `parts` dataset and the remedies sweep (about 1 hour
# together on 2 shared cores).
capsweep run docs/findings/findings-parse-tree.yaml --num-cpus 2
capsweep run docs/findings/findings-remedies.yaml --num-cpus 2
capsweep report --experiment capsweep --sweep findings-parse-tree --out docs/findings/parse_tree
capsweep report --experiment capsweep --sweep findings-remedies --out docs/findings/remedies
