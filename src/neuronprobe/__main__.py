from neuronprobe.cli import main

raise SystemExit(main())
