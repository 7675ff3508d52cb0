// Package chaos injects faults for dimmer's tests and game days: on real TCP
// links to Postgres, Redis and Kafka, and on the store functions a service
// hands to dualwrite and shadowread.
package chaos
