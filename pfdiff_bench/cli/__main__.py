from pfdiff_bench.cli import main

main()
