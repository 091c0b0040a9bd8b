from modelium.runtimes.embedded_server.serve import main

main()
