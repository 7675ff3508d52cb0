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
// Exit codes, from the error's type: 0 done; 2 bad usage (an unknown stage
// or command, an unparsable URL, a bad number, an over-long reason); 3
// refused by the transition rules or guards; 4 conflict with a concurrent
// change; 1 anything else (a store that cannot be reached within --timeout,
// a corrupt stored flag). No password given to the CLI is ever printed.
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
