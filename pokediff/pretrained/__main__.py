import sys

from pokediff.pretrained import main

sys.exit(main())
