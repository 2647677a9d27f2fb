module captchatask.dev/testbed/pause

go 1.22
