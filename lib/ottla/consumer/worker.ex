defmodule Ottla.Consumer.Worker do
  @moduledoc false
  # One process per assigned topic-partition. The NIF sends it a batch only after it asked
  # for one (consumer_demand), so its mailbox holds at most one batch.
  use GenServer, restart: :temporary
  require Logger

  alias Ottla.Native

  def child_spec(args) do
    %{
      id: {__MODULE__, args.topic, args.partition},
      start: {__MODULE__, :start_link, [args]},
      restart: :temporary,
      shutdown: args.shutdown
    }
  end

  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  @impl true
  def init(args) do
    # Trap exits so a shutdown lets the current batch finish (bounded by the child's shutdown).
    Process.flag(:trap_exit, true)
    Process.put(:ottla_topic, args.topic)
    Process.put(:ottla_partition, args.partition)
    Process.put(:ottla_generation_id, args.public_generation)
    Process.put(:ottla_connection, args.connection)

    Logger.metadata(
      topic: args.topic,
      partition: args.partition,
      generation: args.public_generation
    )

    {:ok, handler_state} = args.handler.init(args.handler_init_args)

    case Native.consumer_attach(
           args.resource,
           args.topic,
           args.partition,
           args.generation,
           self()
         ) do
      :ok -> {:ok, Map.put(args, :handler_state, handler_state)}
      {:error, _} -> :ignore
    end
  end

  @impl true
  def handle_info({:ottla_messages, _topic, _partition, _generation, messages}, state) do
    result = state.handler.handle_messages(messages, state.handler_state)
    state = apply_result(result, messages, state)
    Native.consumer_demand(state.resource, state.topic, state.partition, state.generation)
    {:noreply, state}
  end

  # Exits from the supervisor (shutdown, revocation) or from anything linked that crashed
  # stop the worker; a linked helper (a Task, say) ending normally does not.
  def handle_info({:EXIT, _from, :normal}, state), do: {:noreply, state}
  def handle_info({:EXIT, _from, reason}, state), do: {:stop, reason, state}

  def handle_info(other, state) do
    Logger.debug("#{inspect(state.handler)} worker ignored #{inspect(other, limit: 5)}")
    {:noreply, state}
  end

  defp apply_result(tag, messages, state)
       when tag in [:ack, :acknowledge, :no_ack, :noop, :continue],
       do: apply_result({tag, state.handler_state}, messages, state)

  defp apply_result(result, messages, state) do
    case result do
      {tag, handler_state} when tag in [:ack, :acknowledge] ->
        ack(state, List.last(messages).offset)
        %{state | handler_state: handler_state}

      {tag, offset, handler_state} when tag in [:ack, :acknowledge] and is_integer(offset) ->
        partial_ack(state, messages, offset)
        %{state | handler_state: handler_state}

      {tag, handler_state} when tag in [:no_ack, :noop, :continue] ->
        %{state | handler_state: handler_state}

      other ->
        raise ArgumentError,
              "#{inspect(state.handler)}.handle_messages/2 returned #{inspect(other, limit: 5)}; " <>
                "expected {:ack, state}, {:ack, offset, state}, {:no_ack, state}, {:noop, state} " <>
                "or {:continue, state}"
    end
  end

  # Acks up to `offset` (within the batch) and has the rest of the batch delivered again.
  defp partial_ack(state, messages, offset) do
    first = hd(messages).offset
    last = List.last(messages).offset

    cond do
      offset >= last ->
        ack(state, last)

      true ->
        if offset >= first, do: ack(state, offset)

        Native.consumer_redeliver(
          state.resource,
          state.topic,
          state.partition,
          state.generation,
          max(offset + 1, first)
        )
    end
  end

  defp ack(state, offset),
    do:
      Native.consumer_ack(state.resource, state.topic, state.partition, state.generation, offset)
end
