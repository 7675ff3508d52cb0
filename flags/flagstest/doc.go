// Package flagstest is the conformance suite every implementation of the
// dimmer flag contracts must pass: [RunStore] for a [flags.Store], [RunFleet]
// for a [flags.FleetStore] and [RunProvider] for an OpenFeature provider of
// stage flags backed by such a store.
//
// The suites run against whatever the factory returns, so an implementation's
// tests point them at a real server with an isolated namespace per test (see
// package dimmertest) and add only what is specific to their backend:
//
//	func TestStore(t *testing.T) {
//		flagstest.RunStore(t, func(t *testing.T) flags.Store { return newStore(t) })
//	}
//
// Every subtest calls t.Parallel and asks the factory for its own store, so
// the factory must give each call an empty, independent one.
//
// The package is imported by tests only; it uses testify.
package flagstest
