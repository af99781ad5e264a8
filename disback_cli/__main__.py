from disback_cli.cli.app import main

main()
