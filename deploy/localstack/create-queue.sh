#!/bin/sh
# LocalStack runs this once it is ready (mounted into /etc/localstack/init/ready.d by
# docker-compose.yml): the queue the `sluice` service reads, with a dead-letter queue beside it.
awslocal sqs create-queue --queue-name login-queue
awslocal sqs create-queue --queue-name login-dlq
