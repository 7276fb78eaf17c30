from mmia.cli import main

raise SystemExit(main())
