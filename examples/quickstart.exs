# Ottla's quick start on an embedded Kafka (librdkafka's mock cluster): a topic, a few keyed
# messages produced and fetched back, then the same messages through a consumer group with an
# Elsa-style handler. Run it with `scripts/quickstart`.

defmodule Quickstart.Handler do
  use Ottla.Consumer.MessageHandler

  def handle_messages(messages, state) do
    for m <- messages do
      send(state.pid, {:consumed, topic(), partition(), m.offset, m.key, m.value})
    end

    {:ack, state}
  end
end

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
  IO.puts("fetched partition #{partition} (high watermark #{high_watermark}):")

  for m <- fetched do
    IO.puts(
      "  offset #{m.offset}  key=#{m.key}  value=#{inspect(m.value)}  headers=#{inspect(m.headers)}"
    )
  end
end

IO.puts("consuming them again through a consumer group:")

{:ok, sup} =
  Ottla.Supervisor.start_link(
    connection: :quickstart,
    endpoints: endpoints,
    group_consumer: [
      group: "quickstart",
      topics: ["greetings"],
      handler: Quickstart.Handler,
      handler_init_args: %{pid: self()},
      begin_offset: :earliest
    ]
  )

for _ <- messages do
  receive do
    {:consumed, topic, partition, offset, key, value} ->
      IO.puts(
        "  consumed #{topic}/#{partition} offset #{offset}  key=#{key}  value=#{inspect(value)}"
      )
  after
    30_000 -> raise "the consumer group received nothing within 30 s"
  end
end

Supervisor.stop(sup)
{:ok, committed} = Ottla.committed_offsets(endpoints, "quickstart", "greetings")
IO.puts("committed offsets of group quickstart: #{inspect(committed)}")
:ok = Ottla.Testing.stop_mock_cluster(endpoints)
