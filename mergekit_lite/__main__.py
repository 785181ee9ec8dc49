from mergekit_lite.cli import main

main()
