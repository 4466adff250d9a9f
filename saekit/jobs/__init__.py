"""The jobs people start, built on the library: the main job (`demo`), sweeps and their reports,
the self-contained HTML report, the course's shared run and the notebook series.

    demo.py          DemoConfig and run_demo: capture, train, calibrate, evaluate, report
    sweep.py         several architectures x sparsities on one stream, each evaluated, one table
    sweep_report.py  one or several (seeds') sweeps as tables and figures
    report.py        report.html: summary, curves, allocation, feature dashboards in one page
    course.py        the notebooks' shared run folder and their `SAE = ...` choice
    notebooks.py     the series shipped with the package, copied out to work in
"""
