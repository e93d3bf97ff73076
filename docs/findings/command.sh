# The findings runs of docs/FINDINGS.md, from the repository root (2 CPU cores; about 1.5 hours together
# on an otherwise idle machine). The specs are in this folder; the sweeps add their own cnn controls.
capsweep run docs/findings/findings-depth.yaml --num-cpus 2
capsweep run docs/findings/findings-bias.yaml --num-cpus 2
capsweep report --experiment capsweep --sweep findings-depth --out docs/findings/depth
capsweep report --experiment capsweep --sweep findings-bias --reference findings-depth --out docs/findings/bias
