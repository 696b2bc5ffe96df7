from sgl_scd.demo.build import main

main()
