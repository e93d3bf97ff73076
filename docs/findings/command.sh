# The findings runs of docs/FINDINGS.md, from the repository root, on 2 CPU cores (Fashion-MNIST from
# Debian's dataset-fashion-mnist). Each report folder keeps the spec it was made from (spec.yaml); the
# specs here are the ones to run next. The sweeps add their own cnn controls.
#
# Under the convergence protocol (docs/PROBES.md, "Which epoch"); about 2.5 hours on 2 idle cores:
capsweep run docs/findings/findings-depth.yaml --num-cpus 2
capsweep run docs/findings/findings-bias.yaml --num-cpus 2
capsweep report findings-depth --out docs/findings/depth
capsweep report findings-bias --reference findings-depth --out docs/findings/bias
# the candidate findings-depth flags, on 12 fresh seeds (48 trials, about 45 min on 2 cores):
capsweep confirm findings-depth --top 1 --num-cpus 2
capsweep report findings-depth-confirm --out docs/findings/confirm
# the parse tree on the generated parts dataset (60 trials, about 35 min on 2 cores):
capsweep run docs/findings/findings-parse-tree.yaml --num-cpus 2
capsweep report findings-parse-tree --out docs/findings/parse_tree
# the four candidates it flags, on 12 fresh seeds (120 trials, about 65 min on 2 cores):
capsweep confirm findings-parse-tree --top 4 --num-cpus 2
capsweep report findings-parse-tree-confirm --out docs/findings/parse_tree_confirm
# the slice of the remedies that fits 2 CPU cores (30 trials, about 20 min):
capsweep run docs/findings/findings-remedies-cpu.yaml --num-cpus 2
capsweep report findings-remedies-cpu --out docs/findings/remedies_cpu
# the same six routed layers deep (30 trials, about 17 min on 2 cores):
capsweep run docs/findings/findings-remedies-depth6.yaml --num-cpus 2
capsweep report findings-remedies-depth6 --out docs/findings/remedies_depth6
# the same with no routing at all, depth 3 and 6 (45 trials, about 12 min on 2 cores):
capsweep run docs/findings/findings-remedies-uniform.yaml --num-cpus 2
capsweep report findings-remedies-uniform --out docs/findings/remedies_uniform
# the remedy on attention, efficient and self-routing, both family_defaults (78 trials, about 75 min):
capsweep run docs/findings/findings-remedies-families.yaml --num-cpus 2
capsweep report findings-remedies-families --out docs/findings/remedies_families
# its three most promising candidates, on 12 fresh seeds (96 trials, about an hour on 2 cores):
capsweep confirm findings-remedies-families --top 3 --num-cpus 2
capsweep report findings-remedies-families-confirm --out docs/findings/remedies_families_confirm
# the same six routed layers deep, against findings-remedies-families' depth-0 references (42 trials, about 25 min):
capsweep run docs/findings/findings-remedies-families-depth6.yaml --num-cpus 2
capsweep report findings-remedies-families-depth6 --reference findings-remedies-families --out docs/findings/remedies_families_depth6
#
# Not re-run under this protocol (its report is the earlier instrument's, commit 61739c6):
capsweep run docs/findings/findings-remedies.yaml --num-cpus 2
capsweep report findings-remedies --out docs/findings/remedies
#
# Then: python docs/findings/claims.py   (renders docs/FINDINGS.md from the reports)
