from eventhandler.cli import main

main()
