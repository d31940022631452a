// Package crash kills the real daemon with SIGKILL at random points of a
// random workload, over and over, and checks that nothing a successful call
// did is lost and nothing it did not do appears.
package crash
