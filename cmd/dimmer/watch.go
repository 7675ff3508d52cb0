package main

import (
	"bytes"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
)

// clearScreen moves the cursor home and clears the terminal (ANSI), so each
// frame replaces the last one in place.
const clearScreen = "\x1b[H\x1b[2J"

// watchable runs once, or with *every > 0 redraws run's output in place
// every interval until the command's context ends (Ctrl-C), for those who
// keep a terminal open on a migration. A failing frame shows its error and
// the watch goes on: a store that blips at 3 a.m. must not end the watch.
func watchable(every *time.Duration, c *cli, run func(*cobra.Command, []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		if *every == 0 {
			return run(cmd, args)
		}
		if *every < 100*time.Millisecond {
			return usagef("--watch %v: use at least 100ms", *every)
		}
		out := c.out
		defer func() { c.out = out }()
		t := time.NewTicker(*every)
		defer t.Stop()
		for {
			var frame bytes.Buffer
			c.out = &frame
			err := run(cmd, args)
			if err != nil && exitCode(err) == exitUsage {
				return err // bad usage will not get better
			}
			fmt.Fprintf(out, "%severy %v, %s (Ctrl-C to stop)\n\n", clearScreen, *every, time.Now().Format("15:04:05"))
			_, _ = io.Copy(out, &frame)
			if err != nil {
				fmt.Fprintf(out, "\nerror: %v\n", err)
			}
			select {
			case <-cmd.Context().Done():
				return nil
			case <-t.C:
			}
		}
	}
}
