from tutorial_api.cli import main

main()
