from natron.cli import main

main()
