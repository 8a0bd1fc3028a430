from instructune.cli.main import main

raise SystemExit(main())
