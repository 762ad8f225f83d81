"""``python -m lowmem_gblm``: the lowmem-gblm command line."""

from cli.main import main

main()
