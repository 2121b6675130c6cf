"""Reproduction: table specs (:mod:`.tables`), cell planning (:mod:`.cells`), the runner (:mod:`.runner`),
table writers (:mod:`.writers`), exact-metric tables of the analytic model (:mod:`.exact_table`) and plots
(:mod:`.plots`). Import the submodules directly."""
