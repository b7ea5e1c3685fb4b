from vnet.cli.entry import main

main()
