from ddpm.fid import main

main()
