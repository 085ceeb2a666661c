from sleeptui.cli import main

raise SystemExit(main())
