// Package browsertest drives the operator console (package console) in a
// real headless Chromium through the DevTools protocol (chromedp).
//
// It is a module of its own so that chromedp and its protocol packages never
// reach what a service importing dimmer compiles: nothing imports it, and
// the root module does not require chromedp. `make test` runs it like every
// module, after scripts/need-chromium.sh has installed the Debian package
// chromium; without a browser the tests skip, except under CI=true, where
// they fail.
//
// Screenshots of every page the tests visit are written to
// DIMMER_SCREENSHOT_DIR (default: dimmer-console-screenshots in the
// system's temporary directory), and their paths are printed in the test log.
package browsertest
