// Command dimmer is the operator's CLI: it reads and moves migration stages
// through the guarded controller, shows each migration's go/no-go checklist
// and prints the audit log.
//
//	dimmer --store postgres://... stage get orders
//	dimmer stage set orders shadow --reason "backfill verified"
//	dimmer rollout orders live 5 --reason "canary"
//	dimmer status orders
//	dimmer audit orders
//
// Exit codes: 0 done; 2 bad usage or unknown stage; 3 refused by the
// transition rules or guards; 4 conflict with a concurrent change; 1 anything
// else.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
