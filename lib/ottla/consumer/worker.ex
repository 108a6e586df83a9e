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
      # The manager stops workers itself, within the drain timeout; this only bounds a stop
      # by the supervisor when the manager is gone.
      shutdown: 5_000
    }
  end

  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  @impl true
  def init(args) do
    # Trap exits so a shutdown lets the current batch finish (the manager bounds the wait).
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

    # User code runs after init returns, so starting a worker never blocks the manager.
    {:ok, args, {:continue, :start}}
  end

  @impl true
  def handle_continue(:start, state) do
    tp = {state.topic, state.partition}

    with :ok <- announce(state, tp),
         :ok <-
           Native.consumer_attach(
             state.resource,
             state.topic,
             state.partition,
             state.generation,
             self()
           ) do
      # init/1 runs only once the partition is ours; if it fails, the worker exits and the
      # manager restarts it (the NIF keeps the messages).
      case state.handler.init(state.handler_init_args) do
        {:ok, handler_state} ->
          {:noreply, Map.put(state, :handler_state, handler_state)}

        other ->
          {:stop, {:bad_init, state.handler, other}, state}
      end
    else
      {:error, %Ottla.Error{code: :not_assigned}} ->
        # Revoked before this worker could start: the manager is about to hear of it.
        {:stop, {:shutdown, :not_assigned}, state}

      {:assignment_failed, result} ->
        send(state.manager, {:ottla_assignment_failed, tp, result})
        {:stop, {:shutdown, :assignment_received_handler}, state}
    end
  end

  defp announce(%{assignment_received_handler: nil}, _tp), do: :ok

  defp announce(%{assignment_received_handler: {fun, group}} = state, tp) do
    result =
      try do
        fun.(group, state.topic, state.partition, state.public_generation)
      catch
        kind, reason -> {:error, {kind, reason, __STACKTRACE__}}
      end

    case result do
      :ok ->
        send(state.manager, {:ottla_worker_started, tp, state.generation})
        :ok

      other ->
        {:assignment_failed, other}
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

      offset >= first ->
        ack(state, offset)

        Native.consumer_redeliver(
          state.resource,
          state.topic,
          state.partition,
          state.generation,
          offset + 1
        )

      true ->
        # Redelivering from below the batch would hand the same batch back forever.
        Logger.warning(
          "#{inspect(state.handler)} returned {:ack, #{offset}, state} for a batch of offsets " <>
            "#{first}..#{last}: below the batch, so nothing is acked and nothing redelivered"
        )
    end
  end

  defp ack(state, offset),
    do:
      Native.consumer_ack(state.resource, state.topic, state.partition, state.generation, offset)
end
