from natron.cli.main import main

main()
