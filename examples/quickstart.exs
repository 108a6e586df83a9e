# Ottla's quick start: an embedded Kafka (librdkafka's mock cluster), a topic, a few keyed
# messages produced and fetched back. Run it with `scripts/quickstart`.

{:ok, endpoints} = Ottla.Testing.start_mock_cluster(brokers: 1)
IO.puts("embedded Kafka cluster at #{inspect(endpoints)}")

:ok = Ottla.create_topic(endpoints, "greetings", partitions: 2)
{:ok, topics} = Ottla.list_topics(endpoints)
IO.puts("topics: #{inspect(topics)}")

messages = [
  {"alice", "hello"},
  {"bob", "hi there"},
  %{key: "alice", value: "how are you?", headers: [{"lang", "en"}]}
]

:ok = Ottla.produce(endpoints, "greetings", messages)
IO.puts("produced #{length(messages)} messages; every one acknowledged by the cluster")

for partition <- 0..1 do
  {:ok, high_watermark, fetched} = Ottla.fetch(endpoints, "greetings", partition: partition)
  IO.puts("partition #{partition} (high watermark #{high_watermark}):")

  for m <- fetched do
    IO.puts(
      "  offset #{m.offset}  key=#{m.key}  value=#{inspect(m.value)}  headers=#{inspect(m.headers)}"
    )
  end
end

:ok = Ottla.Testing.stop_mock_cluster(endpoints)
