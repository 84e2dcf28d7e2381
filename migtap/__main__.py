from migtap.cli import main

raise SystemExit(main())
